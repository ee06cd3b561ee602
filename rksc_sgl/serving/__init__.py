"""HTTP serving of the embedded engine: SGLang's native API and OpenAI's (``rksc-sgl serve``).

==============  ==============================================================================
module          holds
==============  ==============================================================================
``server``      ``create_app`` (the routes) and ``serve``; every route ends in
                ``Engine.generate_request``
``checks``      what a request may carry: SGLang's /generate fields, OpenAI's fields, prompts
                and chat messages, checked before anything runs
``openai``      OpenAI responses: choices, logprobs, usage, stream chunks
``streaming``   engine streams as server-sent events, closed when the client goes away
``errors``      errors in SGLang's shape and JSON responses
==============  ==============================================================================
"""
