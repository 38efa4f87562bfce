"""Diffusion-model workbench engine: the book's DDPM (step 9 of Deep Learning from Scratch 5) and
an ImprovedUNet, schedules, training, sampling, run folders, evaluation and export.

Never imports streamlit: the dashboard calls into this package, not the other way round.
"""
