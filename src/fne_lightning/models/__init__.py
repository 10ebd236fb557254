"""Models: the open_clip dual encoder, its momentum copy, and our open_clip model configs."""
