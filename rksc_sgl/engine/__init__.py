"""The embedded engine: SGLang frontend backend, scheduler, sampling, constrained decoding.

=================  ===========================================================================
module             holds
=================  ===========================================================================
``request_input``  :class:`GenerateRequest` (SGLang's ``/generate`` request), typed and checked
                   in one place; every caller builds one
``backend``        :class:`Engine`: builds the components, ``handle`` (a request -> scheduler
                   requests -> responses), replays, the CGEE verifier pass, branch stop
``frontend``       SGLang's frontend backend methods (``gen``, ``select``, commits, KV joins),
                   each a ``GenerateRequest`` run through ``handle``
``responses``      SGLang's response shapes (text, ``meta_info``, streams) and the caller's
                   side of a submitted request (``Pending``)
``request``        a scheduler ``Request`` and the engine's counters (``EngineStats``)
``scheduler``      the one thread that owns the model and the KV: admit, prefill, decode, finish
``sampling``       sampling parameters (checked), token sampling, stop strings
``grammar``        regex / JSON-schema constraints through xgrammar
=================  ===========================================================================
"""
