"""The `ganserve` command: one typer app joining the training and service verbs.

This is the only module that sees both `training` and `service` (and `bench`, `repository`).
"""
import typer

from bench.cli import register as register_bench
from repository.cli import register as register_repository
from service.cli import register as register_service
from training.cli import register as register_training

app = typer.Typer(help="ganserve: train GAN generators, evaluate them, sample from them, import published ones, serve them.", no_args_is_help=True)
register_training(app)
register_service(app)
register_repository(app)
register_bench(app)

if __name__ == "__main__":
    app()
