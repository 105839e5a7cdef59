"""The app's web front end beside Gradio: what app.py serves on its own routes (the OpenAI-style completions API).
It builds on serve/, which knows no front end."""
