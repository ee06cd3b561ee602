"""The model: loading, the forward over SGLang's KV pool, attention kernels, chat templates.

==============  ==============================================================================
module          holds
==============  ==============================================================================
``loading``     model aliases (the packaged GGUF converted once), tokenizer and weights
``runner``      :class:`ModelRunner`: one ragged-batch forward over the pool's rows
``attention``   FlashInfer paged attention (CUDA) and the cascade layout shared by forks
``chat``        the chat template a model's prompts are built with (engine and runtime alike)
==============  ==============================================================================
"""
