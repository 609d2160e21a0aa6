"""Runtime patches (installed as ``ntl_deepspeed.patches``)."""
