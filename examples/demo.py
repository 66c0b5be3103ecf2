from isorun import Sandbox

with Sandbox("python") as sb:
    r = sb.exec("python3 -c 'print(sum(range(10**7)))'")
    print(r.stdout)  # 49999995000000
