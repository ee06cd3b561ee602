"""HTTP serving of the embedded engine: SGLang's native API and OpenAI's (``rksc-sgl serve``).

==============  ==============================================================================
module          holds
==============  ==============================================================================
``server``      ``create_app`` and ``serve``; :class:`Routes`, the endpoints as methods: each
                generation endpoint builds ``GenerateRequest``s and calls ``Engine.handle``
``checks``      ``ServerLimits`` (token, batch and body caps on top of the engine's request
                checks), and OpenAI requests (fields, prompts, chat messages) mapped onto
                ``GenerateRequest``s
``served``      the served model: names, model card, chat template and its SGLang name
``openai``      OpenAI responses: choices, logprobs, usage, stream chunks
``streaming``   engine streams as server-sent events, closed when the client goes away
``errors``      errors in SGLang's shape and JSON responses
==============  ==============================================================================

A native ``/generate`` body is checked by ``GenerateRequest.from_body``
(``rksc_sgl/engine/request_input.py``), the same checks ``Engine.generate_request`` and the
frontend backend go through.
"""
