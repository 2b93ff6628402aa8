"""TokSearch's ``toksearch.backend.*`` paths: result-set classes and configs of each backend.

``Pipeline.compute(RayRecordSet, RayConfig(...))`` is TokSearch's long form of
``compute_ray(...)``; every ``compute_*`` returns an instance of its class here.
Nothing heavy is imported: Ray and PySpark load only when a computation runs.
"""
