"""`mnist-cnn serve`: the draw-a-digit page (static/) and its JSON API (app), with the API's
OpenAPI 3.1 contract and its /docs page, built from the app's routes (openapi), and what a
request may take: memory, work slots and time (limits). Never trains."""
