#!/usr/bin/env python
"""Broken copies of the embedded all-MiniLM-L6-v2, to check that evaluation cannot be fooled by them.

    python bench/broken_models.py outputs/broken
    python evaluate.py --model_path default outputs/broken/zero outputs/broken/near_collapse \\
        --data-folder ../shared/data/doc2dial/dev --eval-dataset doc2dial     # both at chance, flagged
    python evaluate.py --model_path outputs/broken/nan --data-folder ../shared/data/doc2dial/dev  # error, exit 2

- zero: every weight 0 (every text embeds to the same vector: pure ties);
- near_collapse: every weight 0 but the last LayerNorm's bias (random): one vector up to float
  rounding, so rounding noise would order the candidates;
- nan: the word embeddings NaN (a diverged model).
"""

import os

import torch

from longcontrast.modeling import DualEncoder, default_model_path, load_encoder, read_pooling

from common import arguments, run


def main(argv=None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("output_dir", help="where the three models are written (OUTPUT_DIR/zero, near_collapse, nan)")
    output_dir, path = parser.parse_args(argv).output_dir, default_model_path()
    for name in ("zero", "near_collapse", "nan"):
        torch.manual_seed(0)
        encoder, tokenizer = load_encoder(path, None, dropout=0.0)
        parameters = dict(encoder.named_parameters())
        last_bias = [n for n in parameters if n.endswith("output.LayerNorm.bias")][-1]
        with torch.no_grad():
            if name == "nan":
                encoder.embeddings.word_embeddings.weight.fill_(float("nan"))
            else:
                for key, parameter in parameters.items():
                    if name == "near_collapse" and key == last_bias:
                        parameter.copy_(torch.randn_like(parameter))
                    else:
                        parameter.zero_()
        DualEncoder(encoder, read_pooling(path) or "cls").save(os.path.join(output_dir, name), tokenizer,
                                                                max_seq_length=512)
    print(f"wrote {output_dir}/zero, near_collapse (all but {last_bias} zero) and nan")
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
