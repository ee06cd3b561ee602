"""The embedded engine: SGLang frontend backend, scheduler, sampling, constrained decoding.

==============  ==============================================================================
module          holds
==============  ==============================================================================
``backend``     :class:`Engine`: the SGLang backend (``gen``/``select``/fork) and
                ``generate_request`` (SGLang's ``/generate`` shapes), which the HTTP server
                calls too
``scheduler``   the one thread that owns the model and the KV: admit, prefill, decode, finish
``sampling``    sampling parameters (checked), token sampling, stop strings
``grammar``     regex / JSON-schema constraints through xgrammar
==============  ==============================================================================
"""
