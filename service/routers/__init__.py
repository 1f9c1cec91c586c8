"""The HTTP routes, one ``APIRouter`` per topic; ``service.app.create_app`` includes them.

* :mod:`.v2`: the Open Inference Protocol (KServe V2): server metadata and health, and the
  model router (metadata, readiness, inference) included under both model paths.
* :mod:`.v1`: the friendly API: the model list, ``:classify`` (JSON pixels or an image).
* :mod:`.admin`: α search and reload, behind the admin token.
* :mod:`.ops`: Prometheus ``/metrics``.

A new endpoint goes in the router of its topic; its route ``name`` is its ``endpoint``
metrics label and must be listed in :data:`service.metrics.ENDPOINTS` (else it counts as
``"other"``).
"""
