"""rksc-sgl inside SGLang's own server runtime (``launch_server``).

- ``launcher``: the ``rksc-sgl launch-server`` command line.
- ``launch_plan``: SGLang's flags checked by SGLang's parser, then the RKSC cache selected and
  the CPU set-up added where there is no GPU.
- ``server_process``: a planned server as one process group: bounded start-up, watched,
  the whole group ended.
- ``lifeline``: runs the server so that its group also ends when the starting process does.
- ``attention_stats``: the ``--forward-hooks`` factory that gives RSBCM real attention
  statistics in the scheduler process.
- ``server_state``: the ``rksc`` entry of ``/server_info`` (counters, idle integrity check).
- ``cpu_site``: a ``sitecustomize`` for SGLang's processes on machines without ``sgl_kernel``.
- ``plugin``: the entry point SGLang calls in every process it starts
  (``rksc_sgl.runtime.plugin:register`` in ``pyproject.toml``): the ``rksc`` cache backend,
  the ``rsbcm`` policy, and the hooks below.
- ``asks``, ``seeded_sampling``: ASKS and per-request seeds as SGLang hooks.
- ``endpoint``, ``client``: the frontend backend and HTTP client for a running server.
- ``bench_servers``: each ``rksc-sgl bench`` mode as a server.
- ``sglang_patches``: the fixes to SGLang's frontend in ``patches/`` (``rksc-sgl patches``).
Nothing here imports SGLang's server modules at import time.
"""
