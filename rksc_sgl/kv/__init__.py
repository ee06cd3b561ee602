"""KV memory and its index: SGLang's pools, one allocator, the tree cache, and KV joins.

==============  ==============================================================================
module          holds
==============  ==============================================================================
``manager``     :class:`KVCacheManager`: pool + allocator + request rows + the tree cache
                (every slot free, in the tree, or owned by one running request)
``join``        ``concate_and_append``: a request over the concatenated KV of branches
==============  ==============================================================================
"""
