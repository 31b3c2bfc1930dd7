// A small frontend client written against the types openapi-typescript generates from /openapi.json
// (api.d.ts, made by the test). tsc must accept it; every @ts-expect-error must be a real error, so types
// that silently became `any` would fail the check too.
import type { components, paths } from "./api";

type Schemas = components["schemas"];
export type ConversationPage =
  paths["/api/conversations"]["get"]["responses"]["200"]["content"]["application/json"];
export type ListQuery = NonNullable<paths["/api/conversations"]["get"]["parameters"]["query"]>;
export type Conversation = Schemas["ConversationDetail"];
export type Report = Schemas["Report"];
export type ApiError = Schemas["ErrorBody"];
export type WhatsAppUpdate = Schemas["WhatsAppUpdate"];

export class ChatsyncClient {
  constructor(
    private readonly base: string,
    private readonly getToken: () => Promise<string>,
  ) {}

  private async call<T>(path: string, init: RequestInit = {}): Promise<T> {
    const response = await fetch(this.base + path, {
      ...init,
      headers: { ...init.headers, Authorization: `Bearer ${await this.getToken()}` },
    });
    if (!response.ok) {
      const body: ApiError = await response.json();
      throw new Error(`${body.error.code}: ${body.error.message}`);
    }
    return (await response.json()) as T;
  }

  listConversations(query: ListQuery): Promise<ConversationPage> {
    const params = new URLSearchParams();
    for (const [name, value] of Object.entries(query)) {
      if (value !== undefined && value !== null) params.append(name, String(value));
    }
    return this.call<ConversationPage>(`/api/conversations?${params}`);
  }

  updateWhatsApp(id: string, body: WhatsAppUpdate): Promise<Conversation> {
    return this.call<Conversation>(`/api/conversations/${encodeURIComponent(id)}/update-whatsapp`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
  }

  analytics(tz: paths["/api/analytics"]["get"]["parameters"]["query"]): Promise<Report> {
    return this.call<Report>(`/api/analytics?tz=${tz?.tz ?? "UTC"}`);
  }
}

// The events a stream sends, by name, with the data the OpenAPI document describes.
export type EventData = {
  "conversation.upserted": Schemas["ConversationUpserted"];
  "sync.finished": Schemas["SyncFinished"];
  expired: Schemas["StreamNotice"];
  reset: Schemas["StreamNotice"];
};

export function describe(name: keyof EventData, data: EventData[keyof EventData]): string {
  if (name === "conversation.upserted") {
    const upserted = data as EventData["conversation.upserted"];
    return `${upserted.chatbot_id}/${upserted.id} changed at ${upserted.changed_at}`;
  }
  if (name === "sync.finished") {
    const finished = data as EventData["sync.finished"];
    return `sync ${finished.run_id}: ${finished.status}`;
  }
  return name;
}

export async function firstNumbers(client: ChatsyncClient): Promise<(string | null)[]> {
  const page = await client.listConversations({ has_whatsapp: true, limit: 20 });
  const report = await client.analytics({ tz: "Asia/Hong_Kong" });
  const rate: number | null = report.whatsapp.capture_rate;
  const grid: number[][] = report.by_weekday_hour;
  // what only API v2 data carries: null, not 0, where the data cannot say
  const ratedUp: number | null = report.feedback.rated_up_share;
  const takenOver: number | null = report.takeover_rate;
  const statuses: { [status: string]: number } | null = report.by_status;
  const trend: (number | null)[] = report.by_day.map((day) => day.rated_down_share);
  void rate;
  void grid;
  void [ratedUp, takenOver, statuses, trend];
  await client.updateWhatsApp(page.data[0].id, { whatsapp_number: "9123 4567" });
  await client.updateWhatsApp(page.data[0].id, { auto: true });
  return page.data.map((c) => c.whatsapp_number);
}

// @ts-expect-error: limit is a number, not text
export const badQuery: ListQuery = { limit: "twenty" };
// @ts-expect-error: a conversation page has no `total`
export const badPage: ConversationPage = { data: [], next_cursor: null, total: 3 };
// @ts-expect-error: an error body always has a code
export const badError: ApiError = { error: { message: "x" } };
// @ts-expect-error: there is no such path
export type Missing = paths["/api/conversation"];
// @ts-expect-error: a share of answers rated up may be null (no API v2 data), so it is not always a number
export const badShare: number = ({} as Report).feedback.rated_up_share;
