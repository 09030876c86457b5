"""The image grid: rows are (prompt, seed), columns are configurations, so every image in a
row starts from the same noise and differences along a row are the configuration's.

`grid_rows` picks the rows to show from the ok results (plain pandas, no images);
`grid_html` draws given images as base64 thumbnails, an undecodable one as a gap.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence

import numpy as np
import pandas as pd

from evals.report.format import config_labels

_GRID_WIDTH_PX = 1120  # room for image columns in the page (main is 1400 px wide, less the prompt column)


def _image_bytes(v) -> bytes | None:
    if v is None:
        return None
    if isinstance(v, dict):
        v = v.get("bytes")
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    if isinstance(v, np.ndarray) and v.dtype == np.uint8 and v.ndim == 1:
        return v.tobytes()
    return None


def _thumbnail(v, px: int) -> tuple[str, int, int] | None:
    """(PNG data URI at most `px` on its longer side, width, height), or None if `v` is no image."""
    from PIL import Image

    try:
        if hasattr(v, "convert") and hasattr(v, "size"):  # a PIL image
            im = v
        else:
            data = _image_bytes(v)
            if data is None:
                return None
            im = Image.open(io.BytesIO(data))
            im.load()
        im = im.convert("RGBA" if im.mode in ("RGBA", "LA", "P") else "RGB")
        if max(im.size) > px:
            im.thumbnail((px, px), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
    except Exception:  # an undecodable image is shown as a gap, not a crash
        return None
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), im.size[0], im.size[1]


def grid_html(
    grid: pd.DataFrame | None,
    *,
    max_prompts: int = 8,
    max_configs: int = 12,
    seeds_per_prompt: int = 1,
    thumb_px: int = 128,
) -> str:
    """An HTML table of thumbnails: one row per (prompt, seed), one column per configuration
    (in order of first appearance), at most `max_prompts` prompts x `seeds_per_prompt` seeds
    and `max_configs` configurations. For each prompt the seeds with images for the most
    configurations are taken, so a row compares configurations on the same noise."""
    need = {"prompt", "seed", "config", "image"}
    if grid is None or len(grid) == 0:
        return '<p class="note">No images were given for the grid.</p>'
    if not need <= set(grid.columns):
        return f'<p class="note">Grid skipped: missing column(s) {", ".join(sorted(need - set(grid.columns)))}.</p>'
    g = grid[grid["image"].notna()]
    g = g.drop_duplicates(["prompt", "seed", "config"], keep="first")
    all_configs = list(pd.unique(g["config"].astype(str)))
    configs = all_configs[:max_configs]
    g = g[g["config"].astype(str).isin(configs)]
    all_prompts = list(pd.unique(g["prompt"]))
    prompts = all_prompts[:max_prompts]
    cells = {(p, s, str(c)): img for p, s, c, img in zip(g["prompt"], g["seed"], g["config"], g["image"])}
    counts = g.groupby(["prompt", "seed"], sort=False).size()
    rows = []
    for p in prompts:
        seeds = counts.loc[p].sort_values(ascending=False, kind="stable").index[:seeds_per_prompt]
        rows += [(p, s) for s in seeds]
    # thumbnails are stored at thumb_px but shown smaller when needed so that the grid fits the page
    show = int(max(48, min(thumb_px, _GRID_WIDTH_PX // max(1, len(configs)) - 6)))
    head = "".join(f'<th class="cfg" style="max-width:{show + 6}px">{html.escape(c)}</th>' for c in configs)
    body = []
    for p, s in rows:
        tds = []
        for c in configs:
            thumb = _thumbnail(cells.get((p, s, c)), thumb_px) if (p, s, c) in cells else None
            if thumb is None:
                tds.append(f'<td class="img missing" style="width:{show}px;height:{show}px">–</td>')
            else:
                uri, w, h = thumb
                scale = show / max(w, h)  # small images are scaled up, large ones down, aspect kept
                w, h = max(1, round(w * scale)), max(1, round(h * scale))
                alt = html.escape(f"{p} | seed {s} | {c}", quote=True)
                tds.append(f'<td class="img"><img src="{uri}" alt="{alt}" title="{alt}" '
                           f'width="{w}" height="{h}"></td>')
        body.append(
            f'<tr><th class="prompt"><div>{html.escape(str(p))}</div><div class="seed">seed {html.escape(str(s))}'
            f"</div></th>{''.join(tds)}</tr>"
        )
    note = ""
    if len(all_configs) > len(configs) or len(all_prompts) > len(prompts):
        note = (f'<p class="note">Showing {len(prompts)} of {len(all_prompts)} prompts and '
                f"{len(configs)} of {len(all_configs)} configurations.</p>")
    return (
        note + '<div class="scroll"><table class="grid"><thead><tr><th class="prompt">prompt / seed</th>'
        + head + "</tr></thead><tbody>" + "".join(body) + "</tbody></table></div>"
    )



def grid_rows(ok: pd.DataFrame, keys: Sequence[str], max_prompts: int, max_configs: int) -> pd.DataFrame:
    """Which ok rows the grid shows (columns prompt, seed, config, sample_id): the first
    `max_prompts` prompts x the first `max_configs` configurations (sorted by `keys`), and for
    each prompt one seed, the smallest that every shown configuration has (else its smallest)."""
    keys = list(keys)
    prompts = list(dict.fromkeys(ok.prompt))[:max_prompts]
    configs = ok[keys].drop_duplicates().sort_values(keys).head(max_configs)
    picked = []
    for p in prompts:
        rows = ok[ok.prompt == p]
        common = set.intersection(*[set(rows.merge(c.to_frame().T.astype(configs.dtypes.to_dict()), on=keys).seed)
                                    for _, c in configs.iterrows()] or [set()])
        seed = min(common) if common else rows.seed.min()
        picked.append(rows[rows.seed == seed].merge(configs, on=keys))
    sel = pd.concat(picked, ignore_index=True) if picked else ok.head(0)
    label = config_labels(sel[keys].reset_index(drop=True), keys).to_numpy() if len(sel) else []
    return pd.DataFrame({"prompt": sel.prompt, "seed": sel.seed, "config": label, "sample_id": sel.sample_id})
