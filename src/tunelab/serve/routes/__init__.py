"""The server's routes, one router per area: OpenAI's inference API (openai.py), its files and fine-tuning
jobs (jobs.py), and the dashboard (dashboard.py). A route reads its request, calls one function of the
layer below (serve.serving, jobs, dashboard) and returns one object; `app.state` holds what they share."""
