"""`tunelab serve`: an OpenAI-compatible HTTP server for base models, runs and adapters.

protocol.py   the OpenAI request objects (pydantic) and the response objects as OpenAI documents them
store.py      what is served: model ids -> folders, loaded lazily, least recently used unloaded, adapters
              of one base sharing its weights
engine.py     the queue the requests wait in and the worker that decodes them
app.py        the routes: thin, a request in, one engine call, one OpenAI object out; errors, keys, limits
"""
