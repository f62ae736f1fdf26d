"""Models whose attention runs tvm_attn's kernels: a Llama-architecture decoder (:mod:`.llama`), its
build step (:mod:`.build`) and a runtime-only session that drives it (:mod:`.runtime`)."""
