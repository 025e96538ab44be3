"""Demo raw data made on the machine: real footage with narration, annotations, planted fMRI."""

from giblet_ds.demo_data.make import (
    DEMO_BUILD_SETTINGS,
    DemoParams,
    DemoPaths,
    make_demo_data,
    oracle_scores,
)

__all__ = ["DEMO_BUILD_SETTINGS", "DemoParams", "DemoPaths", "make_demo_data", "oracle_scores"]
