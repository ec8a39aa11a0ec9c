"""`mnist-cnn serve`: the draw-a-digit page (static/) and its JSON API (app). Never trains."""
