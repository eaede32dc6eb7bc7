"""The safety supervisor ("safety cerebellum"): tensorised safety rules beside a small learned risk scorer."""
