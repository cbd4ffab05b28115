from fedsqueeze.cli import main

main()
