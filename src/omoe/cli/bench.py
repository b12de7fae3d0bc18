"""``omoe bench``: training-step time, tokens/s and memory of the base, LoRA, PEFT LoRA and OMoE; label-evaluation time."""

from omoe import bench


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help=bench.__doc__.splitlines()[0], description=bench.__doc__)
    bench.add_arguments(parser)
    parser.set_defaults(func=bench.main_from_args)
