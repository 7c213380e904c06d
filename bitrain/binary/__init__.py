"""Binary (1-bit) networks: quantizers, epoch-scheduled quantizers, QActivation / QConv2d / QLinear,
the Bop optimizer, the model summary (bits, memory, MACs) and the packed 1-bit export."""
