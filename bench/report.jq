# Renders bench/run.sh's results (a JSON array of rows, `jq -s`) as a markdown table.
# Arguments: $table ("bulk", "latency", "per_request", "pingpong", "http", "grpc", "loss" or "procs"), $conns (the space-separated
# BULK_CONNS). Rows carry `table` ("http", "grpc", "loss"); rows without it belong to bulk and latency.
def num($d): if . == null then "–" else (. * pow(10; $d) | round / pow(10; $d) | tostring) end;
# A ratio only where it means something: both known and a positive denominator.
def ratio($a; $b): if $a == null or $b == null or $b <= 0 then "–" else ($a / $b | num(2)) + "×" end;
def row($cells): "| " + ($cells | join(" | ")) + " |";
def find($p): (map(select(.path == $p)) | first) // {};
def mib: if . then . / 1024 else null end | num(1);

($conns | split(" ") | map(select(length > 0))) as $cs
| . as $all
| map(select(.table == null)) as $tcp
# Baselines of a row's group: rows with `group` (e.g. "veth") are compared with "direct TCP via
# GROUP" and "stunnel pair via GROUP"; the others with "direct TCP" and "stunnel pair".
| def base($r; $p): $tcp | find(if $r.group then "\($p) via \($r.group)" else $p end);
  if $table == "bulk" then
    row(["path"] + ($cs | map("\(.) conn Gbit/s", "× direct", "× stunnel")) + ["notes"]),
    row(["---"] + ($cs | map("---:", "---:", "---:")) + ["---"]),
    ($tcp[] | . as $r | base($r; "direct TCP") as $d | base($r; "stunnel pair") as $s
      | row([$r.path]
          + ($cs | map(. as $c | ($r.bulk[$c] // null) as $g
              | ($g | num(2)), ratio($g; $d.bulk[$c]), ratio($g; $s.bulk[$c])))
          + [$r.note // ""]))
  elif $table == "latency" then
    row(["path", "p50", "p90", "p99", "p99.9", "added p50", "added p99",
           "added p50 ÷ stunnel's", "added p99 ÷ stunnel's", "path CPU (cores)",
           "path peak RSS (MiB)", "missing", "notes"]),
      row(["---", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:",
           "---:", "---"]),
      ($tcp[] | . as $r | ($r.latency.corrected_us // null) as $l
        | (base($r; "direct TCP").latency.corrected_us // {}) as $dl
        | ((base($r; "stunnel pair").latency.corrected_us // {}) as $sl
          | {p50: (if $sl.p50 then $sl.p50 - $dl.p50 else null end),
             p99: (if $sl.p99 then $sl.p99 - $dl.p99 else null end)}) as $sa
        | if $l == null then
            row([$r.path, "–", "–", "–", "–", "–", "–", "–", "–", "–",
                 ($r.peak_rss_kib | mib), "–", $r.note // ""])
          else
            ($l.p50 - $dl.p50) as $a50 | ($l.p99 - $dl.p99) as $a99
            | row([$r.path, ($l.p50 | num(1)), ($l.p90 | num(1)), ($l.p99 | num(1)),
                   ($l.p999 | num(1)), ($a50 | num(1)), ($a99 | num(1)),
                   ratio($a50; $sa.p50), ratio($a99; $sa.p99), ($r.cpu_cores | num(3)),
                   ($r.peak_rss_kib | mib),
                   ($r.latency.missing | tostring), $r.note // ""])
          end)
  elif $table == "per_request" then
    row(["path", "system calls per request", "context switches per request", "per process (calls / switches)"]),
      row(["---", "---:", "---:", "---"]),
      ($tcp[] | . as $r | select($r.per_request) | $r.per_request as $q
        | row([$r.path, ($q | map(.syscalls // 0) | add | num(1)),
               ($q | map(.ctx_switches // 0) | add | num(2)),
               ([range($q | length) as $i
                 | "\($r.procs[$i].name // "?"): \($q[$i].syscalls | num(1)) / \($q[$i].ctx_switches | num(2))"]
                | join(", "))]))
  elif $table == "pingpong" then
    # Closed loop, one connection, one request outstanding: the path's own round trip.
    row(["path", "req/s", "p50", "p99", "p99.9", "added p50", "added p99",
           "added p50 ÷ stunnel's", "added p99 ÷ stunnel's", "errors"]),
      row(["---", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:"]),
      ($tcp[] | . as $r | select($r.pingpong) | ($r.pingpong.uncorrected_us) as $l
        | (base($r; "direct TCP").pingpong.uncorrected_us // {}) as $dl
        | (base($r; "stunnel pair").pingpong.uncorrected_us // {}) as $sl
        | ($l.p50 - ($dl.p50 // $l.p50)) as $a50 | ($l.p99 - ($dl.p99 // $l.p99)) as $a99
        | row([$r.path, ($r.pingpong.achieved_rps | num(0)), ($l.p50 | num(1)), ($l.p99 | num(1)),
               ($l.p999 | num(1)), ($a50 | num(1)), ($a99 | num(1)),
               ratio($a50; (if $sl.p50 then $sl.p50 - $dl.p50 else null end)),
               ratio($a99; (if $sl.p99 then $sl.p99 - $dl.p99 else null end)),
               ($r.pingpong.errors | tostring)]))
  elif $table == "http" or $table == "grpc" then
    # One row per path and load ("cN": closed loop at concurrency N; a number: open loop at that
    # rate); ratios and "added" against the direct row of the table at the same load.
    ($all | map(select(.table == $table))) as $h
    | ($h | find(if $table == "http" then "direct HTTP" else "direct gRPC" end)) as $hd
    | def load: if startswith("c") then "closed, \(.[1:]) conc." else "open \(.)/s" end;
    row(["path", "load", "achieved req/s", "req/s × direct", "p50", "p90", "p99", "p99.9",
           "p50 × direct", "p99 × direct", "added p50", "added p99", "errors", "missing",
           "path CPU (cores)", "CPU per process", "notes"]),
      row(["---", "---", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:",
           "---:", "---:", "---:", "---:", "---:", "---"]),
      ($h[] | . as $r | select($r.http) | ($r.http | keys_unsorted[]) as $rate
        | ($r.http[$rate]) as $x | ($hd.http[$rate] // null) as $dx
        | ($dx.corrected_us // null) as $dl
        | if $x == null then
            row([$r.path, ($rate | load), "failed", "–", "–", "–", "–", "–", "–", "–", "–", "–",
                 "–", "–", "–", "–", $r.note // ""])
          else
            ($x.corrected_us) as $l
            | row([$r.path, ($rate | load), ($x.achieved_rps | num(0)),
                   ratio($x.achieved_rps; $dx.achieved_rps),
                   ($l.p50 | num(1)), ($l.p90 | num(1)), ($l.p99 | num(1)), ($l.p999 | num(1)),
                   ratio($l.p50; $dl.p50), ratio($l.p99; $dl.p99),
                   (if $dl then $l.p50 - $dl.p50 else null end | num(1)),
                   (if $dl then $l.p99 - $dl.p99 else null end | num(1)),
                   ($x.errors | tostring), ($x.missing | tostring),
                   ($r.cpu_cores[$rate] // null | num(3)),
                   ($r.cpu_each[$rate] // null | if . then map(num(2)) | join(" / ") else "–" end),
                   $r.note // ""])
          end),
      ($h[] | select(.http == null) | row([.path, "–", "–", "–", "–", "–", "–", "–", "–", "–",
                                           "–", "–", "–", "–", "–", "–", .note // ""]))
  elif $table == "loss" then
    # Ratios against the same path with no loss and no bulk.
    ($all | map(select(.table == "loss"))) as $ls
    | row(["path", "loss %", "bulk running", "bulk Gbit/s", "p50", "p90", "p99", "p99.9",
           "p99 × quiet", "p99.9 × quiet", "missing"]),
      row(["---", "---:", "---", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:"]),
      ($ls[] | . as $r
        | if $r.latency == null and $r.note then
            row([$r.path, "–", "–", "–", "–", "–", "–", "–", "–", "–", $r.note])
          else
            (($ls | map(select(.path == $r.path and .loss_pct == 0 and .bulk == false))
              | first.latency.corrected_us) // null) as $q
            | ($r.latency.corrected_us // {}) as $l
            | row([$r.path, ($r.loss_pct | tostring), (if $r.bulk then "yes" else "no" end),
                   ($r.bulk_gbps | num(3)), ($l.p50 | num(1)), ($l.p90 | num(1)),
                   ($l.p99 | num(1)), ($l.p999 | num(1)), ratio($l.p99; $q.p99),
                   ratio($l.p999; $q.p999), ($r.latency.missing // null | tostring)])
          end)
  else
    # procs: each process of each row (the loss rows' processes once, at their last row).
    row(["path", "process", "CPU s (life)", "peak RSS (MiB)"]),
    row(["---", "---", "---:", "---:"]),
    ($all | map(select(.procs and (.procs | length) > 0))
      | group_by(.path) | map(last) | .[]
      | . as $r | .procs[]
      | row([$r.path, .name, (.cpu_s | num(2)), (.peak_rss_kib | mib)]))
  end
