"""4-bit expert weights (bitsandbytes NF4/FP4) packed one contiguous buffer per expert.

spec.py  QuantSpec and its exact byte cost (shared with the fit planner)
nf4.py   quantize/dequantize one matrix; PackedExpert, ExpertLayout, pack_expert(s)
ffn.py   the expert FFN on 4-bit weights; QuantizedExperts, an expert backend
io.py    packed experts to/from safetensors with validated metadata
layer.py ExpertBuffer: one layer's experts in one [E, nbytes] buffer (the 4-bit MoE kernel's input)
"""
