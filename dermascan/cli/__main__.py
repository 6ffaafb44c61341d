from dermascan.cli import main

main()
