"""The Streamlit dashboard: app.py routes to one page per view; the modules here hold no model math."""
