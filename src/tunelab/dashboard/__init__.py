"""The dashboard on `tunelab serve`: runs, jobs, live curves, comparisons and a playground, as one page of
plain HTML, CSS and JavaScript (with uPlot, shipped) over small JSON endpoints (serve/routes/dashboard.py, answered by `dashboard.service`)."""
