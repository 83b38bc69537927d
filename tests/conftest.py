pytest_plugins = ["trio_launcher.testing", "pytester"]
