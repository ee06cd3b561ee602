"""KV memory and its index: SGLang's pools, one allocator, the tree cache, and KV joins.

==============  ==============================================================================
module          holds
==============  ==============================================================================
``records``     the KV layout, a request's row state (``ReqKV``), an ASKS alias
``manager``     :class:`KVCacheManager`: pool + allocator + request rows + the tree cache
                (match, open, extend, commit, checkpoint, release; scratch slots)
``integrity``   the invariant: every slot free, in the tree, owned by one running request
                or borrowed as scratch, exactly once; locks balance
``compaction``  decode-KV compression applied to a row (kept slots move down, dropped freed)
``join``        ``concate_and_append``: the concatenated KV of a fork's branches
==============  ==============================================================================
"""
