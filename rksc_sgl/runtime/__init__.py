"""rksc-sgl inside SGLang's own server runtime (``launch_server``).

- ``launcher``: ``rksc-sgl launch-server`` -- SGLang's server with the RKSC cache selected,
  CPU set-up where there is no GPU, a bounded start-up, the whole process group ended.
- ``attention_stats``: the ``--forward-hooks`` factory that gives RSBCM real attention
  statistics in the scheduler process.
- ``server_state``: the ``rksc`` entry of ``/server_info`` (counters, idle integrity check).
- ``cpu_site``: a ``sitecustomize`` for SGLang's processes on machines without ``sgl_kernel``.

The plugin entry point itself is ``rksc_sgl.plugin:register`` (``pyproject.toml``).
Nothing here imports SGLang's server modules at import time.
"""
