"""`tokenmill inspect`: a dataset's schema, metadata, versions and counts, and sample rows as a person reads them."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from tokenmill.reports.dataset import DatasetView, png_bytes
from tokenmill.reports.render import code_grid_lines, contact_sheet, describe_pieces, marked_text, visible
from tokenmill.schemas.tables import type_json


def describe_text_row(view: DatasetView, row: dict[str, Any]) -> dict[str, Any]:
    """The row's text and its tokens, each with the exact bytes it stands for (the tokenizer's `token_pieces`).

    A token that starts or ends inside a character (byte-level BPE, byte
    fallback) shows that character's bytes as \\xNN and carries "split":
    "start", "end" or "both"; in "marked" a boundary inside a character is drawn
    as ¦ instead of |.
    """
    ids = [int(i) for i in row["tokens"]]
    raw = view.tokenizer.token_pieces(ids)
    pieces = describe_pieces(raw)
    tokens = []
    for i, b, p in zip(ids, raw, pieces, strict=True):
        token = {"id": i, "text": p.text, "chars": p.chars, "bytes": len(b)}
        split = {(True, False): "start", (False, True): "end", (True, True): "both"}.get((p.starts_inside,
                                                                                         p.ends_inside))
        if split:
            token["split"] = split
        tokens.append(token)
    return {"text": b"".join(raw).decode("utf-8", "replace"),
            "marked": marked_text([p.text for p in pieces], inside=[p.ends_inside for p in pieces]),
            "tokens": tokens}


def describe_visual_row(view: DatasetView, row: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """Grid and codes (or a latent summary), and a PNG reconstruction (image) or contact sheet (video)."""
    values = view.payload(row)
    out: dict[str, Any] = {"grid": list(row["grid"]), "height": row.get("height"), "width": row.get("width")}
    if view.kind == "hard":
        out["codes"] = values.reshape(row["grid"]).tolist()
    else:
        v = values.astype(np.float64)
        out["latents"] = {"shape": list(values.shape), "dtype": view.manifest.tokenizer.get("latent_dtype"),
                          "mean": float(v.mean()) if v.size else 0.0, "std": float(v.std()) if v.size else 0.0}
    if view.modality == "video":
        out.update({k: row.get(k) for k in ("clip_start", "clip_end", "fps", "frame_indices")})
    os.makedirs(out_dir, exist_ok=True)
    try:
        picture = view.reconstruction(row)  # as `tokenmill decode` decodes it
        key = "reconstruction"
        if view.modality == "video":
            picture, key = contact_sheet(picture), "contact_sheet"
        path = os.path.join(out_dir, f"{row['id']}-{key.replace('_', '-')}.png")
        with open(path, "wb") as f:
            f.write(png_bytes(picture))
        out[key] = path
    except Exception as e:  # the tokenizer file moved, say: show the rest, say why
        out["reconstruction_error"] = f"{type(e).__name__}: {e}"
    return out


def describe_row(view: DatasetView, row: dict[str, Any], out_dir: str) -> dict[str, Any]:
    base = {k: row[k] for k in ("id", "source", "locator", "num_tokens")}
    if view.modality == "text":
        return {**base, **describe_text_row(view, row)}
    return {**base, **describe_visual_row(view, row, out_dir)}


def inspect_dataset(root: str, *, rows: int = 3, row_id: str | None = None, out_dir: str = ".") -> dict[str, Any]:
    """Everything `tokenmill inspect` shows, as JSON-able data. KeyError if `row_id` is not in the dataset."""
    view = DatasetView(root)
    m = view.manifest
    if row_id is not None:
        found = view.row(row_id)
        if found is None:
            raise KeyError(row_id)
        sample = [found]
    else:
        sample = view.rows(rows)
    return {
        "root": root,
        "modality": m.modality,
        "kind": view.kind,
        "schema": [{"name": f.name, "type": type_json(f.type), "nullable": f.nullable} for f in view.schema()],
        "metadata": view.metadata(),
        "versions": view.versions(),
        "counts": {"rows": m.rows, "tokens": m.tokens, "errors": m.errors, "data_files": len(m.files),
                   "error_files": len(m.error_files), "inputs": len(m.inputs)},
        "rows": [describe_row(view, r, out_dir) for r in sample],
    }


def format_inspection(result: dict[str, Any], max_tokens: int = 64) -> str:
    """The inspection as text for a terminal."""
    c, meta = result["counts"], result["metadata"]
    lines = [f"dataset {result['root']}: {result['modality']}, {result['kind']} tokens",
             f"  counts:    {c['rows']} rows, {c['tokens']} tokens, {c['errors']} errors, "
             f"{c['data_files']} data files, {c['error_files']} error files, {c['inputs']} inputs",
             f"  tokenizer: {meta.get('spec')} ({meta.get('name')}), fingerprint {str(meta.get('fingerprint'))[:12]}",
             "  schema:"]
    lines += [f"    {f['name']}: {f['type']}{'' if f['nullable'] else ' not null'}" for f in result["schema"]]
    lines.append("  versions:")
    lines += [f"    {v.get('version')}  {v.get('created_at')}  rows {v.get('rows')}, tokens {v.get('tokens')}, "
              f"errors {v.get('errors')}" for v in result["versions"]]
    for row in result["rows"]:
        lines += ["", f"row {row['id']}  ({row['source']} {row['locator']}), {row['num_tokens']} tokens"]
        if "tokens" in row:
            lines.append("  text:   " + visible(row["text"]))
            shown = row["tokens"][:max_tokens]
            lines.append("  tokens: " + marked_text([t["text"] for t in shown],
                                                    inside=[t.get("split") in ("end", "both") for t in shown])
                         + (" ..." if len(row["tokens"]) > max_tokens else ""))
            lines.append("  ids:    " + " ".join(f"{t['id']}:{t['chars']}" for t in shown)
                         + (" ..." if len(row["tokens"]) > max_tokens else "") + "   (id:characters)")
            continue
        grid = row["grid"]
        lines.append(f"  grid:   {' x '.join(map(str, grid))}  ({row.get('height')} x {row.get('width')} pixels)")
        if "clip_start" in row:
            lines.append(f"  clip:   {row['clip_start']} s to {row['clip_end']} s at {row['fps']} fps, "
                         f"frames {row['frame_indices']}")
        if "codes" in row:
            lines.append("  codes:")
            lines += ["    " + line for line in code_grid_lines(np.asarray(row["codes"]), grid)]
        else:
            lat = row["latents"]
            lines.append(f"  latents: {lat['shape'][0]} x {lat['shape'][1]} {lat['dtype']}, "
                         f"mean {lat['mean']:.3f}, std {lat['std']:.3f}")
        for key, label in (("reconstruction", "reconstruction"), ("contact_sheet", "contact sheet")):
            if key in row:
                lines.append(f"  {label}: {row[key]}")
        if "reconstruction_error" in row:
            lines.append(f"  no reconstruction: {row['reconstruction_error']}")
    return "\n".join(lines)
