"""Training: data windows and sampling, the step, the optimizer's schedule, the memory planner, the model builder, checkpoint choreography and the loop."""
