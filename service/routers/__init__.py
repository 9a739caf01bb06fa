"""The API's routers, one per resource: health, catalogue (models, operators, methods), jobs."""
