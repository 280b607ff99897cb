"""Beyond one process: the fit in shards under a memory budget (:mod:`.sharded`,
:mod:`.memory_plan`) and on Ray (:mod:`.distributed`: the fit's shards and the predict
loop's chunks on Ray workers)."""
