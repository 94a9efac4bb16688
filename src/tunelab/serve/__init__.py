"""`tunelab serve`: an OpenAI-compatible HTTP server for base models, runs and adapters, with OpenAI's
files and fine-tuning jobs API and the dashboard.

app.py        the app: the routers mounted, and the guard every request passes first
security.py   who may ask: the key, Host (DNS rebinding), Origin (cross-site requests), content types
redact.py     no path of the server's machine in an answer
routes/       one router per area: openai.py, jobs.py, dashboard.py
serving.py    the serving layer: a request in, the model checked, one engine job, one OpenAI object out
protocol.py   the OpenAI request objects (pydantic), each turning itself into the decoder's Sampling
engine.py     the queue the requests wait in and the worker that decodes them (continuous batching)
store.py      what is served: model ids -> folders (a cached catalogue), loaded lazily, least recently
              used unloaded, adapters of one base sharing its weights
http.py       request bodies and OpenAI's error objects, for every route
"""
