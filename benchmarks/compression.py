"""Lossless compression of a run's test images with bits-back coding, measured against the bound.

For each backend's run and each T: the file size (bits/dim, whole file), the coder's net bits (excluding
the one-off initial bits and the header), the initial bits, the model's discrete-time VLB of the same
images with the same T (vdm.loss_terms at every t = i/T, vdm_*/compress.discrete_vlb) term by term beside
the same terms on the latents actually coded, encode and decode images/s, the round trip, and PNG's and
gzip's sizes of the same images. Then whether each backend's file decodes in the other.

    python -m benchmarks.compression --jax_run=runs/quickstart_jax --torch_run=runs/quickstart_torch
    python -m benchmarks.compression --jax_run=RUN --timesteps=20,100 --num_images=60 --json=out.json

The weights are the EMA of the newest neutral checkpoint (checkpoints/neutral/step_*.safetensors).
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import math
import re
import time
from pathlib import Path

import numpy as np

from vdm_common import bitsback, compressed_file
from vdm_common import data as data_lib
from vdm_common import workdir as workdir_lib
from vdm_common.bitsback import CompressionError
from vdm_common.neutral import load_neutral


def newest_neutral(run: str) -> Path:
    files = list((Path(run) / "checkpoints" / "neutral").glob("step_*.safetensors"))
    if not files:
        raise SystemExit(f"error: {run} has no checkpoints/neutral/step_*.safetensors")
    return max(files, key=lambda p: int(re.findall(r"\d+", p.name)[0]))


def load_face(backend: str, run: str):
    if backend == "jax":
        from vdm_jax import compress
    else:
        import torch
        torch.set_num_threads(max(1, torch.get_num_threads()))
        from vdm_torch import compress
    path = newest_neutral(run)
    return compress, compress.ModelFace.from_neutral(load_neutral(path)), path


def png_bytes(images: np.ndarray) -> tuple[int, int]:
    """(total bytes of one PNG per image, bytes of one PNG of all images stacked), optimised, 8-bit."""
    from PIL import Image

    def size(array):
        buffer = io.BytesIO()
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buffer, "PNG", optimize=True)
        return buffer.tell()
    return sum(size(x) for x in images), size(images.reshape(-1, *images.shape[2:]))


def measure(compress, face, images: np.ndarray, timesteps: int) -> tuple[dict, bytes]:
    n, dims = len(images), images.size
    per_dim = dims / n * math.log(2)
    for rows in (1 << k for k in range(bitsback.MAX_BATCH.bit_length())):    # compile (JAX) before timing
        face.eps_hat(np.zeros((rows, *images.shape[1:])), 0.5)
        face.decoder_logprobs(np.zeros((rows, *images.shape[1:])))
    start = time.perf_counter()
    data, stream = compressed_file.encode_file(face, images, timesteps, collect_terms=True)
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    decoded = compress.decompress(face, data)
    decode_s = time.perf_counter() - start
    vlb = compress.discrete_vlb(face, images, timesteps)
    terms = stream.terms
    bound = (vlb["recon"] + vlb["klz"] + vlb["diff"]) / per_dim
    coded = terms.total / per_dim
    header = compressed_file.read_header(data).header_bytes
    paired = coded - bound
    row = dict(
        backend=face.backend, T=timesteps, images=n, dims=dims, file_bytes=len(data), header_bytes=header,
        file_bpd=8 * len(data) / dims, initial_bits=stream.initial_bits, net_bpd=stream.net_bits / dims,
        vlb_bpd=float(bound.mean()), vlb_stderr=float(bound.std(ddof=1) / math.sqrt(n)),
        coded_bpd=float(coded.mean()), coded_minus_vlb=float(paired.mean()),
        coded_minus_vlb_stderr=float(paired.std(ddof=1) / math.sqrt(n)),
        coded_rb_bpd=float(((terms.recon + terms.klz + terms.diff_kl) / per_dim).mean()),
        terms_coded=dict(recon=float(terms.recon.mean() / per_dim), prior=float(terms.prior.mean() / per_dim),
                         diff=float(terms.diff.mean() / per_dim)),
        terms_vlb={k: float(v.mean() / per_dim) for k, v in vlb.items()},
        noise_mean_square=float(terms.noise_sq.sum() / (dims * (timesteps + 1))),
        chunks=len(stream.chunks), growth=stream.growth, widened=stream.widened,
        encode_s=encode_s, decode_s=decode_s, encode_img_s=n / encode_s, decode_img_s=n / decode_s,
        round_trip=bool(np.array_equal(decoded, images)))
    return row, data


def cross_decode(face, data: bytes, writer: str) -> str:
    """What happens when `face` (another backend) decodes a file `writer` wrote: the header check refuses
    it; decoding the stream anyway (bitsback.decode, past the check) shows why."""
    try:
        compressed_file.decompress(face, data)
        return "decoded (unexpected)"
    except CompressionError as e:
        refusal = str(e).split(":")[0]
    header = compressed_file.read_header(data)
    words = np.frombuffer(data[header.header_bytes - 4:-4], "<u4").astype(np.uint32)
    stream = bitsback.Stream(header.timesteps, header.num_images, header.image_shape, header.grid_bits,
                             header.max_batch, header.growth, header.pool_words, header.kept, words,
                             top_words=compressed_file.CHECKSUM_WORDS)
    try:
        images, checksum = bitsback.decode(face, stream)
        same = np.array_equal(checksum, compressed_file.checksum_words(images))
        forced = "the forced decode returned the right images" if same else \
            "the forced decode returned wrong images (SHA-256 differs)"
    except CompressionError as e:
        forced = f"the forced decode failed: {e}"
    except Exception as e:  # noqa: BLE001  (a report of what happened, whatever it is)
        forced = f"the forced decode raised {type(e).__name__}: {e}"
    return f"refused ({refusal}); {forced}"


def table(rows: list[dict], baselines: dict) -> str:
    lines = ["| backend | T | file bpd | net bpd (no initial bits, no header) | initial bits | header bytes | "
             "discrete VLB bpd | coded - VLB (paired) | encode img/s | decode img/s | round trip |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['T']} | {r['file_bpd']:.4f} | {r['net_bpd']:.4f} | {r['initial_bits']} | "
                     f"{r['header_bytes']} | {r['vlb_bpd']:.4f} +- {r['vlb_stderr']:.4f} | "
                     f"{r['coded_minus_vlb']:+.4f} +- {r['coded_minus_vlb_stderr']:.4f} | {r['encode_img_s']:.1f} | "
                     f"{r['decode_img_s']:.1f} | {'identical' if r['round_trip'] else 'DIFFERS'} |")
    lines.append("")
    lines += [f"- {name}: {value}" for name, value in baselines.items()]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jax_run", help="a run directory, measured with the JAX backend")
    parser.add_argument("--torch_run", help="a run directory, measured with the torch backend")
    parser.add_argument("--timesteps", default="20,100,1000")
    parser.add_argument("--num_images", type=int, default=0, help="the first N test images (0: all)")
    parser.add_argument("--json", help="write the rows as JSON here")
    args = parser.parse_args()
    runs = [(b, r) for b, r in (("jax", args.jax_run), ("torch", args.torch_run)) if r]
    if not runs:
        raise SystemExit("error: give --jax_run and/or --torch_run")
    config = workdir_lib.read_config(runs[0][1])
    images = data_lib.load_dataset(config.data).test
    images = images[:args.num_images] if args.num_images else images
    dims = images.size
    png_each, png_strip = png_bytes(images)
    raw = np.ascontiguousarray(images).tobytes()
    baselines = {"images": f"{len(images)} test images of {images.shape[1:]} ({dims} dims)",
                 "PNG, one file per image": f"{8 * png_each / dims:.3f} bpd",
                 "PNG, all images in one": f"{8 * png_strip / dims:.3f} bpd",
                 "gzip -9 of the uint8 pixels": f"{8 * len(gzip.compress(raw, 9)) / dims:.3f} bpd",
                 "raw": f"{math.log2(config.model.vocab_size):.3f} bpd (log2 of the vocabulary)"}
    rows, files, faces = [], {}, {}
    for backend, run in runs:
        compress, face, path = load_face(backend, run)
        faces[backend] = face
        print(f"{backend}: {path}", flush=True)
        for T in map(int, args.timesteps.split(",")):
            row, data = measure(compress, face, images, T)
            rows.append(row)
            files[backend, T] = data
            print(json.dumps(row), flush=True)
    if len(faces) == 2:
        T = min(t for _, t in files)
        cross = {}
        for writer, reader in (("jax", "torch"), ("torch", "jax")):
            # The reader gets the writer's weights, so only the backend differs.
            compress, _, path = load_face(reader, dict(runs)[writer])
            face = compress.ModelFace.from_neutral(load_neutral(path))
            cross[f"{writer} file, {reader} decoder (T={T})"] = cross_decode(face, files[writer, T], writer)
        baselines.update(cross)
    print(table(rows, baselines))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows, baselines=baselines), indent=1) + "\n")


if __name__ == "__main__":
    main()
