"""The diffusion process: schedule tables and conversions, the samplers, the sampling generator and guidance."""
