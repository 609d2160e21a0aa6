"""Pretrain with DeepSpeed ZeRO-3 and CE + lambda*NTL (the same as ``ntl-pretrain``).

    deepspeed --num_gpus 2 launch/pretrain.py --deepspeed_config configs/zero3_cpu_tiny.json \
        --model configs/model/llama_tiny.json
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ntl_deepspeed.train.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
