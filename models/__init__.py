"""Reference perception and safety models, their data generators, metrics and training recipes.

    model = fxopt.models.create("pointpillars", preset="kitti")
    inputs = fxopt.models.example_inputs("pointpillars", preset="kitti")
    result = fxopt.models.train("pointpillars", steps=200)
"""

from fxopt.models.registry import (
    ModelSpec,
    TrainingRecipe,
    create,
    example_inputs,
    names,
    register_model,
    spec,
)
from fxopt.models.training import TrainResult, recipe, train

__all__ = [
    "ModelSpec", "TrainResult", "TrainingRecipe", "create", "example_inputs", "names",
    "recipe", "register_model", "spec", "train",
]
