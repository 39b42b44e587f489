"""Ray Serve: teacher and student behind one OpenAI-compatible endpoint, with a weighted, sticky A/B alias.

    distill serve runs/default        # see serve/app.py
"""
