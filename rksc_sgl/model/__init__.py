"""The model: loading, the forward over SGLang's KV pool, attention kernels, chat templates.

==================  ==========================================================================
module              holds
==================  ==========================================================================
``loading``         model aliases (the packaged GGUF converted once), tokenizer and weights
``runner``          :class:`ModelRunner`: one ragged-batch forward over the pool's rows, with
                    the attention statistics and ASKS features it collects (given at
                    construction); :class:`LayerPass`, that forward a block at a time
``attention_plan``  which decode items share a slot prefix (cascade groups), which run alone
``attention``       FlashInfer paged attention (CUDA) and the cascade layout shared by forks
``rope``            :class:`KeyRotation`: cached keys moved to another position (ASKS, joins)
``chat``            the chat template a model's prompts are built with (engine and runtime)
==================  ==========================================================================
"""
