"""The Ray Serve layer of cmr: thin deployments over the core library (see services/README.md).

``services`` may import ``cmr``; ``cmr`` never imports ``services``, Ray Serve or FastAPI.
"""
