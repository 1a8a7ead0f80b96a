"""Gradio demos (thin clients of mmspec's public APIs): ``python -m demos.vlm_chat``, ``python -m demos.image_gen``."""
