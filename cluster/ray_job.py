"""Run a ``cmr`` command as a Ray job on a running Ray cluster.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python cluster/ray_job.py train --ray --policy carve --out /var/lib/cmr/serve/checkpoints/carve
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python cluster/ray_job.py tune cmr --storage /var/lib/cmr/tune

The KubeRay RayJobs (``k8s/base/rayjob-*.yaml``) run the same, from ``/opt/cmr`` in the image.

Why a wrapper and not ``cmr`` itself: ``cmr train --ray`` starts a local Ray when none is
initialised (right on a laptop, wrong on a cluster: a second Ray beside the cluster's, or an error
when the job's ``RAY_ADDRESS`` is set). Here the driver connects to the cluster first —
``cmr.raycluster.start("auto")`` takes ``RAY_ADDRESS``, which ``ray job submit`` sets, else the Ray
started on this node — so the trainer's workers and the Tune trials are scheduled across its
nodes. The arguments after the script name are ``cmr``'s, unchanged; so is the exit status
(2 with one line for bad input).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Connect to the running cluster, then run ``cmr ARGV`` in this driver."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    import ray

    from cmr import raycluster
    from cmr.cli import main as cmr_main

    try:
        raycluster.start("auto", log_to_driver=True)
    except ConnectionError as e:  # no cluster: say so in one line, as cmr does for bad input
        print(f"ray_job: error: no running Ray cluster to connect to ({e}); start one with `ray start --head`", file=sys.stderr)
        return 2
    try:
        return cmr_main(argv)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
