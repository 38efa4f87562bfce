"""Placeholder until the dashboard lands: proves `make run` opens a page."""
import streamlit as st

st.title("Diffusion workbench")
st.write("The dashboard is being built; use `python -m core --help` meanwhile.")
