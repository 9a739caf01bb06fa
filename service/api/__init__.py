"""The API layer: the operator kinds' and methods' own declarations (``operators``, ``guidance``)
turned into the HTTP contract — request schema, ``GET /v1/operators`` and ``/v1/methods``, and
the wording of their errors. The layers below know nothing of HTTP.

- ``operators``: each kind's wire model (its spec with arrays in their request encodings), its
  JSON schema, and an ``OperatorSpecError`` worded as a request error.
- ``methods``: each method's request model, made from its config's declared fields, and a
  ``MethodError`` worded as a request error.
"""
