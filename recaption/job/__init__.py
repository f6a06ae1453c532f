"""The captioning job: plan, read, caption and commit units; the output directory, its lease and done manifest; placement and progress."""

from __future__ import annotations

from typing import TYPE_CHECKING

from recaption.lazy import lazy_exports

if TYPE_CHECKING:
    from recaption.job.captioning import CaptionStage
    from recaption.job.manifest import DoneManifest
    from recaption.job.pipeline import (
        RunSummary,
        init_ray,
        place_models,
        prompt_fallbacks,
        resolve_prompts,
        run_metadata,
        run_pipeline,
    )
    from recaption.job.placement import pool_size
    from recaption.job.planning import Plan, format_plan, plan_run
    from recaption.job.progress import PROGRESS_FILE, Progress
    from recaption.job.stages import payload_schema
    from recaption.job.summary import format_kinds, print_summary
    from recaption.job.tracking import make_trackers, parse_report_to
    from recaption.job.writer import (
        DONE_DIR,
        METADATA_KEY,
        OUTPUT_KIND,
        OUTPUT_SCHEMA,
        OWNER_FILE,
        RUN_INFO,
        OutputDir,
        is_legacy_part,
        open_output,
        output_totals,
        read_run_metadata,
        unit_of_marker,
        unit_stats,
    )

# The names other rooms use, loaded on first use (recaption/lazy.py).
_EXPORTS = {
    "CaptionStage": "recaption.job.captioning",
    "DONE_DIR": "recaption.job.writer",
    "DoneManifest": "recaption.job.manifest",
    "METADATA_KEY": "recaption.job.writer",
    "OUTPUT_KIND": "recaption.job.writer",
    "OUTPUT_SCHEMA": "recaption.job.writer",
    "OWNER_FILE": "recaption.job.writer",
    "OutputDir": "recaption.job.writer",
    "PROGRESS_FILE": "recaption.job.progress",
    "Plan": "recaption.job.planning",
    "Progress": "recaption.job.progress",
    "RUN_INFO": "recaption.job.writer",
    "RunSummary": "recaption.job.pipeline",
    "format_kinds": "recaption.job.summary",
    "format_plan": "recaption.job.planning",
    "init_ray": "recaption.job.pipeline",
    "is_legacy_part": "recaption.job.writer",
    "make_trackers": "recaption.job.tracking",
    "open_output": "recaption.job.writer",
    "output_totals": "recaption.job.writer",
    "parse_report_to": "recaption.job.tracking",
    "payload_schema": "recaption.job.stages",
    "place_models": "recaption.job.pipeline",
    "plan_run": "recaption.job.planning",
    "pool_size": "recaption.job.placement",
    "print_summary": "recaption.job.summary",
    "prompt_fallbacks": "recaption.job.pipeline",
    "read_run_metadata": "recaption.job.writer",
    "resolve_prompts": "recaption.job.pipeline",
    "run_metadata": "recaption.job.pipeline",
    "run_pipeline": "recaption.job.pipeline",
    "unit_of_marker": "recaption.job.writer",
    "unit_stats": "recaption.job.writer",
}
__all__ = [
    "CaptionStage",
    "DONE_DIR",
    "DoneManifest",
    "METADATA_KEY",
    "OUTPUT_KIND",
    "OUTPUT_SCHEMA",
    "OWNER_FILE",
    "OutputDir",
    "PROGRESS_FILE",
    "Plan",
    "Progress",
    "RUN_INFO",
    "RunSummary",
    "format_kinds",
    "format_plan",
    "init_ray",
    "is_legacy_part",
    "make_trackers",
    "open_output",
    "output_totals",
    "parse_report_to",
    "payload_schema",
    "place_models",
    "plan_run",
    "pool_size",
    "print_summary",
    "prompt_fallbacks",
    "read_run_metadata",
    "resolve_prompts",
    "run_metadata",
    "run_pipeline",
    "unit_of_marker",
    "unit_stats",
]


__getattr__ = lazy_exports(__name__, _EXPORTS)
