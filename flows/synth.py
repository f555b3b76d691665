"""Flow of the synth stage: the built-in demo dataset in ImageFolder layout."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from alexnet.atomic import atomic_output
from alexnet.params import SynthParams
from alexnet.synth import SYNTH_OWNER, plan_jobs, refuse, write_mapping, write_oddities
from flows.progress import gather
from tasks.synth import synth_images


@flow(name="synth")
def synth_flow(out: str, synth: SynthParams) -> dict:
    """Draw the demo dataset into `out` (replaced whole when complete)."""
    p = synth
    jobs = plan_jobs(p.classes, p.train_per_class, p.val_per_class)
    refuse(out)
    with atomic_output(out, folder=SYNTH_OWNER) as root:
        futures = [
            synth_images.submit(
                job, str(root), p.seed, p.min_side, p.max_side, p.quality, p.clutter
            )
            for job in jobs
        ]
        images = sum(gather(futures, "synth", [job.count for job in jobs]))
        odd = write_oddities(root, p.classes, p.oddities, p.seed, p.quality)
        write_mapping(root, p.classes)
    get_run_logger().info("wrote %d images and %d odd files to %s", images, odd, out)
    return {"images": images, "oddities": odd, "path": str(Path(out))}


if __name__ == "__main__":
    from flows.stages import main

    main("synth", synth_flow)
