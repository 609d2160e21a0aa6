"""Our own pretraining application (DeepSpeed ZeRO-3 + NTL): trainer, data, metrics, report.
Users' own scripts need none of this: see :mod:`ntl_deepspeed.integrations.deepspeed`."""
