"""Figures of a finished run: per-object posterior panels and the run report.

    write_object_figures(output, catalog, prior, [object_id, ...])  -> {object_id: PNG URI | why not}
    write_run_report(output)                                         -> PNG URI

Both read the output catalog the run wrote (its rows, map columns and
``run_config.json``), so they can be drawn after any run, by the job (``--figures``,
``--report``) or from Python. An object's figure needs what the catalog does not keep:
its observation. It is staged again from the input catalog with the run's own
configuration (the same ``Stager`` the engine uses, so the stamp, PSF and offset are the
ones the sampler saw); the re-convolved posterior mean is computed from the stored mean
flux map. Samples are shown when the run kept some (``SamplerConfig.keep_samples``).

Figures go to ``<output>/_d4a_figures/`` (``schema.FIGURES_DIR``), local or s3://: each
PNG is drawn in a temporary folder and copied there.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from d4a_batch.config import RunConfig, from_dict
from d4a_batch.figures import object_figure, run_report
from d4a_batch.pack_sampler import pack_observations
from d4a_batch.prior.artifact import read_prior_config
from d4a_batch.sampling.summaries import flux_samples, reconvolved_flux
from d4a_batch.schema import DATASET_DIR, FIGURES_DIR, RUN_CONFIG_FILE, Col, Status
from d4a_batch.survey.hats_io import InputCatalog, open_input_catalog, read_partition
from d4a_batch.survey.packs import IMAGE, OFFSET, PSF, VALID, VARIANCE
from d4a_batch.survey.staging import Stager
from d4a_batch.survey.storage import absolute_uri, filesystem, join_uri
from d4a_batch.survey.tensors import tensor_numpy

MAP_COLUMNS = (Col.MEAN_X, Col.STD_X, Col.MEAN_FLUX, Col.STD_FLUX, Col.VARIANCE_RATIO,
               Col.SAMPLES_X)  # fmt: skip


def read_run_config(output: str, storage_options: dict[str, Any] | None = None) -> RunConfig:
    """The RunConfig the run that wrote ``output`` used (its ``run_config.json``)."""
    fs, path = filesystem(join_uri(absolute_uri(output), RUN_CONFIG_FILE), storage_options)
    with fs.open(path, "r") as f:
        return from_dict(RunConfig, json.load(f))


def read_output_rows(
    output: str,
    object_ids: Iterable[int] | None = None,
    with_maps: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> pa.Table:
    """Rows of the output catalog (all, or those of ``object_ids``), with or without maps."""
    fs, path = filesystem(join_uri(absolute_uri(output), DATASET_DIR), storage_options)
    schema = pq.ParquetDataset(path, filesystem=fs).schema
    columns = [n for n in schema.names if with_maps or n not in MAP_COLUMNS]
    filters = None if object_ids is None else [(Col.OBJECT_ID, "in", [int(i) for i in object_ids])]
    return pq.read_table(path, filesystem=fs, columns=columns, filters=filters)


def _put(local: Path, dest_dir: str, storage_options) -> str:
    uri = join_uri(dest_dir, local.name)
    fs, path = filesystem(uri, storage_options)
    fs.makedirs(filesystem(dest_dir, storage_options)[1], exist_ok=True)
    fs.put_file(str(local), path)
    return uri


def _input_rows(cat: InputCatalog, ids: set[int], config: RunConfig, bands, so) -> dict[int, dict]:
    """Input rows (engine column names) of ``ids``, read partition by partition until all are found."""
    found: dict[int, dict] = {}
    for part in cat.partitions:
        table = read_partition(part, config.columns, tuple(bands), cat.healpix_column, so)
        for row in table.filter(pa.compute.is_in(table[Col.OBJECT_ID], pa.array(list(ids)))
                                ).to_pylist():  # fmt: skip
            found.setdefault(int(row[Col.OBJECT_ID]), row)
        if len(found) == len(ids):
            break
    return found


def write_object_figures(
    output: str,
    catalog: str,
    prior: str,
    object_ids: Iterable[int],
    dest: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> dict[int, str]:
    """One posterior figure per object of ``object_ids``: {object_id: PNG URI, or why none}.

    ``output``: the run's output catalog; ``catalog``: its input catalog; ``prior``: the
    prior artifact the run used (its config sets the model grid). Objects that are not in
    the output, failed (status error), or whose run wrote no maps get a reason instead.
    """
    so = storage_options
    output, catalog = absolute_uri(output), absolute_uri(catalog)
    dest = dest or join_uri(output, FIGURES_DIR)
    ids = [int(i) for i in object_ids]
    config = read_run_config(output, so)
    prior_cfg, _ = read_prior_config(prior)
    a, bands = prior_cfg.stretch.a, tuple(prior_cfg.bands)
    table = read_output_rows(output, ids, True, so)
    rows = {
        int(r[Col.OBJECT_ID]): i for i, r in enumerate(table.select([Col.OBJECT_ID]).to_pylist())
    }
    result: dict[int, str] = {}
    wanted: set[int] = set()
    for oid in ids:
        if oid not in rows:
            result[oid] = "not in the output catalog"
        elif table[Col.STATUS][rows[oid]].as_py() != Status.OK:
            result[oid] = f"status error: {table[Col.MESSAGE][rows[oid]].as_py()}"
        elif Col.MEAN_FLUX not in table.column_names:
            result[oid] = "the run wrote no maps (RunConfig.write_maps = False)"
        else:
            wanted.add(oid)
    if not wanted:
        return result
    maps = {c: tensor_numpy(table[c]) for c in MAP_COLUMNS if c in table.column_names}
    cat = open_input_catalog(catalog, so)
    inputs = _input_rows(cat, wanted, config, bands, so)
    stager = Stager(cat.root, prior_cfg, config.physics, config.staging, so)
    staged = {int(o.ident[Col.OBJECT_ID]): o for o in stager.stage_rows(
        [inputs[i] for i in sorted(wanted) if i in inputs], threads=4)}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="d4a_figures_") as tmp:
        for oid in sorted(wanted):
            obj = staged.get(oid)
            if obj is None or obj.error:
                result[oid] = f"cannot stage it again: {obj.error if obj else 'not in the input'}"
                continue
            k, arr = rows[oid], obj.arrays
            one = {name: arr[name][None] for name in (IMAGE, VARIANCE, VALID, PSF)}
            obs = pack_observations(one | {OFFSET: np.asarray([obj.offset])}, dtype=torch.float64)
            scale = np.asarray([obj.scale])
            mean_flux = maps[Col.MEAN_FLUX][k : k + 1].astype(np.float64)
            if Col.SAMPLES_X in maps:
                samples, _ = flux_samples(maps[Col.SAMPLES_X][k : k + 1], obs, scale, a)
                samples = samples[0]
            else:
                samples = np.zeros((0, *mean_flux.shape[1:]))
            row = {c: table[c][k].as_py() for c in (Col.CHI2, Col.HALLUCINATION, Col.UPSAMPLING,
                                                    Col.FLAG_NAMES, Col.PHOTOZ, Col.FLAG_REASONS)}  # fmt: skip
            src = obj.sources  # detection on the stamp (None: staged without it)
            notes = [
                f"z {row[Col.PHOTOZ]:.3f}   u {row[Col.UPSAMPLING]:.2f}",
                f"chi2/dof {row[Col.CHI2]:.2f}",
                f"score {row[Col.HALLUCINATION]:.3f}",
                f"flags {row[Col.FLAG_NAMES] or '-'}",
                "  ".join(f"mag_{b} {table[f'mag_{b}'][k].as_py():.2f}" for b in bands),
            ]
            if src is not None:
                notes.insert(3, f"neighbours masked {src.n_neighbours} "
                             f"({100 * src.neighbour_masked_fraction:.0f} % of the stamp), "
                             f"contamination {src.contamination:.2g} chi2/dof "
                             f"(share {src.blend_fraction:.3f}), asymmetry {src.asymmetry:.3f}, "
                             f"truncated {src.truncated_fraction:.3f}")  # fmt: skip
            detection = {} if src is None else {
                "segmap": src.segmap, "target": src.target, "neighbour_mask": src.neighbour_mask}  # fmt: skip
            local = object_figure(
                Path(tmp) / f"{oid}.png", observation=arr[IMAGE], variance=arr[VARIANCE],
                valid=arr[VALID].astype(bool), reconvolved=reconvolved_flux(mean_flux, obs, scale)[0],
                mean_flux=mean_flux[0], std_flux=maps[Col.STD_FLUX][k],
                variance_ratio=maps[Col.VARIANCE_RATIO][k], samples_flux=samples,
                title=f"object {oid}", notes=notes,
                aperture_radius_frac=config.sampler.aperture_radius_frac, a=a,
                footprint=obj.footprint, offset=obj.offset,
                flag_reasons=row[Col.FLAG_REASONS] or "", **detection,
            )  # fmt: skip
            result[oid] = _put(local, dest, so)
    return result


def write_run_report(
    output: str, dest: str | None = None, storage_options: dict[str, Any] | None = None
) -> str:
    """The run report (score, χ², flag and status distributions over the catalog): PNG URI."""
    so = storage_options
    output = absolute_uri(output)
    config = read_run_config(output, so)
    df = read_output_rows(output, None, False, so).to_pandas()
    bands = [c[len("mag_") :] for c in df.columns if c.startswith("mag_") and "err" not in c]
    with tempfile.TemporaryDirectory(prefix="d4a_report_") as tmp:
        local = run_report(Path(tmp) / "report.png", df, bands, config.sampler.flags)
        return _put(local, dest or join_uri(output, FIGURES_DIR), so)
